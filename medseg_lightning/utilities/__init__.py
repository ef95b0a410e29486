"""Helpers every stage shares and no library provides in the form needed here."""
