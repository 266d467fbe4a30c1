"""The host: attaches plugins to stock trainers and calls their hooks."""
