"""Where the repository's declarative assets live (the package is installed editable from the repo)."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
SQL_OLTP_DIR = REPO_ROOT / "sql" / "oltp"
MONGO_DIR = REPO_ROOT / "mongo"
SQL_EXAMPLES_DIR = REPO_ROOT / "sql" / "examples"
