"""spotex core package."""
