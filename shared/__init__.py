"""What the gateway and the workers both import: settings, errors, models, HTTP edge helpers."""
