from django.http import JsonResponse
from rest_framework import serializers, viewsets

from .models import Book

STATS = {"requests": 0}


class CountRequests:
    """Counts the requests that reach the app (`GET /__stats` is not counted)."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        if request.path == "/__stats":
            return JsonResponse(STATS)
        STATS["requests"] += 1
        return self.get_response(request)


class BookSerializer(serializers.ModelSerializer):
    class Meta:
        model = Book
        fields = ["id", "title", "stock", "version"]
        read_only_fields = ["version"]


class BookViewSet(viewsets.ModelViewSet):
    queryset = Book.objects.order_by("id")
    serializer_class = BookSerializer
