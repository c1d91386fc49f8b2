"""Tests for ciliate.loader (real kernel, root)."""
