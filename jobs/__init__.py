"""spotex jobs package."""
