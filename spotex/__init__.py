"""spotex spotex package."""
