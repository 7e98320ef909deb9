//! The shared end-to-end scenarios (`edge_filter_e2e::scenarios`) in a real Envoy 1.40
//! with `envoy/envoy.yaml`. `E2E_SCENARIOS=a,b` runs only the scenarios named.

use edge_filter_e2e::scenarios::{self, EnvoyLauncher};

#[test]
fn shared_scenarios_pass_in_envoy() {
    scenarios::run(&EnvoyLauncher);
}
