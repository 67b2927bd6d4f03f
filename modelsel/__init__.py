"""modelsel: cross-validated Optuna studies of PyTorch MLPs, regime maps and reports.

The package root stays import-light (the CLI's ``--help`` must be fast); import the
public API from its modules: :func:`modelsel.spec.load_spec`,
:func:`modelsel.study.run_study`, :func:`modelsel.report.build_report`.
"""

__version__ = "0.1.0"
