"""picomaml.meta subpackage."""
