// Two-entry output register (skid buffer) of one crossbar output.
//
// `in_ready` is a register (it does not depend on `out_ready` in the same cycle), so the
// sink's tready never reaches the crossbar's arbiters combinationally; the second entry
// keeps a flit a cycle of back-pressure would otherwise lose, so an output that is not
// back-pressured moves one flit every cycle. Latency: one cycle from in to out.
`timescale 1ns / 1ps
`default_nettype none

module slicefab_xbar_skid #(
    parameter integer WIDTH = 8
) (
    input  wire             clk,
    input  wire             rst,
    input  wire [WIDTH-1:0] in_data,
    input  wire             in_valid,
    output wire             in_ready,
    output wire [WIDTH-1:0] out_data,
    output wire             out_valid,
    input  wire             out_ready
);
    reg             main_valid, skid_valid;
    reg [WIDTH-1:0] main_data, skid_data;

    assign in_ready = !skid_valid;
    assign out_valid = main_valid;
    assign out_data = main_data;

    always @(posedge clk) begin
        if (rst) begin
            main_valid <= 1'b0;
            skid_valid <= 1'b0;
            main_data <= {WIDTH{1'b0}};
            skid_data <= {WIDTH{1'b0}};
        end else if (!main_valid || out_ready) begin
            // the main register empties (or was empty): refill it from the skid, else
            // from the input
            if (skid_valid) begin
                main_data <= skid_data;
                skid_valid <= 1'b0;
                main_valid <= 1'b1;
            end else begin
                main_data <= in_data;
                main_valid <= in_valid;
            end
        end else if (in_valid && !skid_valid) begin
            // back-pressured with a flit arriving: park it
            skid_data <= in_data;
            skid_valid <= 1'b1;
        end
    end
endmodule

`default_nettype wire
