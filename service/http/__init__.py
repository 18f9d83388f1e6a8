"""Everything that speaks HTTP: the FastAPI app, routes, dependencies, error mapping, middleware.

The only package that imports FastAPI or Starlette (tests/test_architecture.py checks it). It turns
requests into calls on the engines and the engines' answers and errors into responses.
"""
