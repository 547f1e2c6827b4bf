"""picomaml.model subpackage."""
