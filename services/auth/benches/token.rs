//! Token signing, and verification: cold (signature checked) and cached (the same token again).
//!
//! Run: `cargo bench -p toka-auth --bench token`

#![allow(clippy::unwrap_used)] // benchmark set-up

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use toka_auth::signing::SigningKey;
use toka_contract::api::auth::{Claims, JwksReply};
use toka_contract::{Action, Capability, Pattern, TokenId};
use toka_runtime::token::Verifier;

const NOW: u64 = 1_764_150_000;

fn claims(jti: u128) -> Claims {
    Claims {
        exp: NOW + 3_600,
        caps: vec![
            Capability::new(Pattern::AnyAgent, &[Action::Spawn, Action::Read]),
            Capability::new(Pattern::AnyQueue, &[Action::Claim, Action::Complete]),
        ],
        chain: vec![TokenId::from_u128(1)],
        depth: 1,
        ..toka_contract::testing::claims(jti, NOW)
    }
}

fn verify(c: &mut Criterion) {
    let key = SigningKey::from_seed("k1", [7; 32]);
    let jwks = JwksReply { keys: vec![key.jwk()] };
    eprintln!(
        "config: Ed25519 (EdDSA) JWT with 2 capabilities and a 1-link chain; cold = a new verifier per token, cached = the same token again"
    );
    let token = key.sign(&claims(2)).unwrap();
    c.bench_function("verify/cold", |b| {
        b.iter_batched(
            || Verifier::new(&jwks, 2).unwrap(),
            |v| black_box(v.verify(&token, NOW).unwrap()),
            criterion::BatchSize::SmallInput,
        )
    });
    let claims = claims(3);
    c.bench_function("sign", |b| b.iter(|| black_box(key.sign(black_box(&claims)).unwrap())));
    let warm = Verifier::new(&jwks, 2).unwrap();
    warm.verify(&token, NOW).unwrap();
    c.bench_function("verify/cached", |b| b.iter(|| black_box(warm.verify(&token, NOW).unwrap())));
}

criterion_group!(benches, verify);
criterion_main!(benches);
