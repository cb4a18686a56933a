"""Benchmarks: each writes JSON and a PNG under benchmarks/results/ and compares with a baseline."""
