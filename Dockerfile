# The writing-sessions image: worker, migrate, flower and CLI all run from it.
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
RUN useradd --create-home --uid 1000 app
WORKDIR /app
COPY pyproject.toml requirements.lock README.md alembic.ini celeryconfig.py ./
COPY worker ./worker
COPY tasks ./tasks
COPY migrations ./migrations
# The versions the tests passed on (requirements.lock), not the newest the ranges allow.
RUN pip install --no-cache-dir -c requirements.lock . && mkdir /app/var && chown app /app/var
USER app
CMD ["writing-sessions", "worker", "--loglevel", "INFO"]
