"""Relational storage: table definitions and engine setup (SQLite or PostgreSQL)."""
