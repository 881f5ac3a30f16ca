"""python -m drf_app --port 8000: a fresh database with two books and the user alice (password
"secret"), then gunicorn with threads (its gthread worker, which keeps connections alive for its
default 2 s)."""

import argparse
import os
import sys
import tempfile

parser = argparse.ArgumentParser()
parser.add_argument("--port", type=int, default=8000)
args = parser.parse_args()
os.environ.setdefault("DRF_APP_DB", os.path.join(tempfile.mkdtemp(), "db.sqlite3"))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "drf_app.settings")

import django  # noqa: E402

django.setup()
from django.contrib.auth.models import User  # noqa: E402
from django.core.management import call_command  # noqa: E402

from drf_app.models import Book  # noqa: E402

call_command("migrate", run_syncdb=True, verbosity=0)
User.objects.create_user("alice", password="secret")
Book.objects.create(title="Dune", stock=3)
Book.objects.create(title="Emma", stock=5)

from gunicorn.app.wsgiapp import run  # noqa: E402

sys.argv = [
    "gunicorn",
    "--bind",
    f"127.0.0.1:{args.port}",
    "--threads",
    "4",
    "drf_app.wsgi:application",
]
run()
