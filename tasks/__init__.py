"""The Celery tasks producers call, by their stable names."""
