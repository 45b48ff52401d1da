"""spotex cockpit package."""
