"""Serving the trained model to interactive clients: a long-lived synthesis worker (``custom.serving.worker``)."""
