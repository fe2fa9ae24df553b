pub mod m20261126_000001_tenants;
