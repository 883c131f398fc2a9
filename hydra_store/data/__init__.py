"""Data sets and models: reading the built-in and user data sets, the built-in networks, the
`package.module:function` plug-in grammar, and the exact training data of a run."""
