from selhelp import make_input  # noqa: F401  (fixture)
