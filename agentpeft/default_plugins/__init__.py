"""Built-in features, registered through the same hooks a third-party plugin uses."""
