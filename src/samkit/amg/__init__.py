"""Automatic mask generation ("segment everything"): mask utilities and, later, the generator."""
