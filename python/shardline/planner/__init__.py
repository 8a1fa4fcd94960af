"""Layout planner: which TP x PP x SP x DP (x EP) layout serves a model best on a cluster.

The planner is arithmetic only: a model description (model_spec), a cluster description
(cluster), an alpha-beta model of each collective (collectives), memory and per-step
costs of one layout (cost), the layouts a model can take (layouts), and their ranking
with a one-line explanation of the pick (ranking). `shardline plan` is its command line
(command); `shardline plan --profile` measures this machine's constants (profile).
"""
