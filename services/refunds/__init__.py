"""refunds: a second workflow on opsflow, from billing: refund requests paid back exactly once.

    refund.requested -> refund-check (rules) -> refund-approval (a person, when the
    rules ask: agents, then the finance lead) -> refund-payout (pays through the
    payment partner) -> refund.paid | refund.payout_failed

Written only in this folder, from opsflow's nodes: the rules step
(``opsflow.nodes.rules``: ``check``), the human task (``opsflow.nodes.human``:
``approval``), the effect step (``opsflow.nodes.effect``: ``payout``), and the
projection framework (``readmodel``). ``payments_sim`` stands in for the
payment partner on loopback. ``application`` declares it all to opsflow.
"""
