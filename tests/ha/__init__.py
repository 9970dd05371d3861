"""Two-site high availability (issue 18): the failover scenarios on two network namespaces."""
