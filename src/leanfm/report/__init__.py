"""Terminal table and HTML report, both built only from results.json."""
from .html import write_report  # noqa: F401
from .table import print_table  # noqa: F401
