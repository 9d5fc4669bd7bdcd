"""The compliance dashboard's page (page.py) and its style (style.css), served by api/compliance.py."""
