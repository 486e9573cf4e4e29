//! The config parser on arbitrary text: `Config::parse` must answer every input with a config
//! or with located errors, never a panic.

#![no_main]

use agentwatch::config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The daemon reads its config with `read_to_string`: text that is not UTF-8 never gets here.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Config::parse(text, "fuzz.toml") {
        Ok(config) => {
            for agent in &config.agents {
                // What the daemon writes into the kernel is what the rules compile to.
                assert_eq!(
                    Some(&agent.compiled),
                    agentwatch::egress::compile(&agent.egress).ok().as_ref(),
                    "agent {}: compiled rules differ from its egress list",
                    agent.name
                );
            }
        }
        Err(errors) => {
            // Every refusal says why and where, within the file.
            assert!(!errors.errors.is_empty(), "an error without a message");
            let lines = text.split('\n').count();
            for e in &errors.errors {
                assert!(
                    (1..=lines).contains(&e.line) && e.col >= 1,
                    "error {e:?} outside the {lines}-line text"
                );
            }
        }
    }
});
