"""The HTTP gateway: the FastAPI app, its routes, dependencies, middleware, auth, limits and audit log."""
