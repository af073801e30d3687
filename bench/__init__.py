"""`akd bench`: what the teacher service costs and saves, measured side by side.

Each benchmark alternates the things it compares within one run, repeats them,
and reports medians and ratios against its targets. Speed targets live
here and only here: the test suite checks that the benchmarks run, never how fast.
"""
