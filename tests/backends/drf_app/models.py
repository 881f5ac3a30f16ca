from django.db import models


class Book(models.Model):
    title = models.CharField(max_length=200)
    stock = models.IntegerField(default=0)
    version = models.IntegerField(default=1)

    def save(self, *args, **kwargs):
        if self.pk is not None:
            self.version += 1
        super().save(*args, **kwargs)
