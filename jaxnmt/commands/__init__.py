"""One module per --mode of `python -m jaxnmt.main`; each has `main(workdir, flags)`.
Nothing else in the package imports them.
"""
