"""Recipe search (``leanfm search``): budgets, objectives and the Pareto set of measured recipes."""
