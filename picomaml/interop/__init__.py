"""Interoperation with the pico ecosystem and the Hub: the pico-analyze run layout and background uploads to
the Hugging Face Hub."""
