import os

SECRET_KEY = os.environ.get("JWT_SECRET", "dev-only-secret")
DEBUG = False
ALLOWED_HOSTS = ["*"]
ROOT_URLCONF = "drf_app.urls"
INSTALLED_APPS = [
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "rest_framework",
    "drf_spectacular",
    "drf_app",
]
MIDDLEWARE = [
    "drf_app.views.CountRequests",
    "django.middleware.common.CommonMiddleware",
]
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.environ["DRF_APP_DB"],
    }
}
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"
USE_TZ = True
REST_FRAMEWORK = {
    # DRF's defaults (session and basic) with simplejwt added, as its docs suggest.
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "rest_framework_simplejwt.authentication.JWTAuthentication",
        "rest_framework.authentication.SessionAuthentication",
        "rest_framework.authentication.BasicAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticatedOrReadOnly"],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
}
SIMPLE_JWT = {"SIGNING_KEY": SECRET_KEY, "ALGORITHM": "HS256"}
SPECTACULAR_SETTINGS = {"TITLE": "Bookshop", "VERSION": "1.0.0"}
