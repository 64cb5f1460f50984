"""Which experts stay: the criterion registry (criteria), the plan and its rules (plan), the ways to choose (choose)."""
