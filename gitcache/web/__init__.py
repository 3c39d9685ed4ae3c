"""The HTTP surface: routes, handlers, HTTP semantics and the error middleware."""
