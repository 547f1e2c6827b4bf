"""picomaml.eval subpackage."""
