"""Validation with lm-eval: the recipe's `validate` block, gates, side-by-side tables and sweeps.

Submodules: `tasks` (bundled offline tasks, local YAMLs, built-ins), `runner` (lm-eval on one model),
`gates` (require/select, pure), `table` (text tables), `sweep` (choosing a parameter by evaluation),
`report` (validating an output folder and recording the results). Importing this package is cheap;
torch, transformers and lm-eval load only when something is evaluated.
"""
