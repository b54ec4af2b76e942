"""The infercache server: ``create_app`` builds the FastAPI app behind ``infercache serve``."""

from infercache.server.app import create_app

__all__ = ["create_app"]
