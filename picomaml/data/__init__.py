"""picomaml.data subpackage."""
