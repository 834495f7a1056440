"""Small models, inventories and latency models that tests (and users' tests) reuse."""
