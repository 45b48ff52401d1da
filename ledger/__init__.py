"""spotex ledger package."""
