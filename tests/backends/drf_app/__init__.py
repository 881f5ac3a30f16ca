"""A bookshop API written the way Django REST Framework's tutorial writes one, for cachegate's
tests: a `DefaultRouter` (every route ends in a slash; Django's `APPEND_SLASH` redirects the
other spelling), simplejwt tokens (the user is the `user_id` claim), `IsAuthenticatedOrReadOnly`
beside DRF's default Session and Basic authentication, drf-spectacular's OpenAPI document, and
gunicorn with its default 2 s keep-alive. Nothing here knows about the gateway.
"""
