"""softprompt compare: methods side by side on one task, and the report."""
