"""Tests of the esvit package (a package so that ``from tests.reference import ...`` works from
the test modules, from ``python -m pytest`` and from scripts that put the repository root on sys.path)."""
