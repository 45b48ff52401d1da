"""spotex edge package."""
