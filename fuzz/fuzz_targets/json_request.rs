//! Strict JSON decoding of request bodies and their validation into commands, on arbitrary
//! bytes. Checks, besides "no panic": a decoded `TransferRequest` survives a serialize/decode
//! round trip, and a command built from it carries exactly the validated fields.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wallet::api::json::{BatchRequest, MoneyRequest, OpenAccountRequest, TransferRequest, decode, max_amount};
use wallet::core::{CommandKind, Currency, TransactionId, parse_amount};

fn check_transfer(request: &TransferRequest, prefix: &str) {
    let again: TransferRequest =
        decode(&serde_json::to_vec(request).expect("serializable")).expect("a decoded request re-encodes into a decodable one");
    assert_eq!(format!("{again:?}"), format!("{request:?}"));
    let Ok(command) = request.to_command(7, prefix) else { return };
    assert_eq!(command.timestamp_ns, 7);
    assert_eq!(Some(command.transaction_id), TransactionId::parse(&request.transaction_id));
    let CommandKind::Transfer { from, to, amount, currency } = command.kind else {
        panic!("a transfer request built {command:?}")
    };
    assert_eq!(from.as_str(), request.from_account);
    assert_eq!(to.as_str(), request.to_account);
    assert_eq!(Ok(currency), Currency::new(&request.currency));
    assert_eq!(Ok(amount), parse_amount(&request.amount, currency, max_amount()));
    assert!(amount > 0 && amount <= max_amount());
}

fuzz_target!(|data: &[u8]| {
    if let Ok(request) = decode::<TransferRequest>(data) {
        check_transfer(&request, "");
    }
    if let Ok(batch) = decode::<BatchRequest>(data) {
        for (i, request) in batch.transfers.iter().enumerate() {
            check_transfer(request, &format!("transfers[{i}]"));
        }
    }
    if let Ok(request) = decode::<MoneyRequest>(data) {
        for deposit in [true, false] {
            if let Ok(command) = request.to_command(7, deposit) {
                let (CommandKind::Deposit { amount, .. } | CommandKind::Withdraw { amount, .. }) = command.kind else {
                    panic!("a money request built {command:?}")
                };
                assert!(amount > 0 && amount <= max_amount());
            }
        }
    }
    let _ = decode::<OpenAccountRequest>(data);
});
