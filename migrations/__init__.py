"""Alembic migrations: the only thing that changes the database schema."""
