"""Small, real, offline experiments used by the tests, the demo and the benchmarks.

Not imported by `import soupkern` (they need torch and scikit-learn).
"""
